// alchemium dashboard: the only script. Everything works without it but these three.
(function () {
  "use strict";
  // Live pages reload every data-refresh seconds, unless a form field is being edited.
  var seconds = Number(document.body.dataset.refresh || 0);
  if (seconds > 0) {
    setInterval(function () {
      var active = document.activeElement;
      if (!active || !/^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName)) location.reload();
    }, seconds * 1000);
  }
  // "Select all" on the dead letters page.
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll("input[name=ids]").forEach(function (box) {
        box.checked = all.checked;
      });
    });
  }
  // Ask before destructive or bulk actions (buttons with data-confirm).
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  });
})();
