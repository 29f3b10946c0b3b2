// alchemium dashboard: the only script. Everything works without it but these three.
(function () {
  "use strict";
  // Live pages reload every data-refresh seconds, but never under an operator's hand: not
  // while a field is being edited, the pointer is on an action form, or a form is on its way.
  // <body data-live> says what the last tick decided: "waiting" (no tick yet), "held",
  // "reloading" or "stopped" (a form was sent); scripts and tests can wait on it.
  var seconds = Number(document.body.dataset.refresh || 0);
  var submitting = false;
  document.addEventListener("submit", function () { submitting = true; }, true);
  if (seconds > 0) {
    document.body.dataset.live = "waiting";
    var timer = setInterval(function () {
      var active = document.activeElement;
      var editing = active && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName);
      var aiming = document.querySelector("form[method=post]:hover");
      if (submitting) {
        clearInterval(timer);
        document.body.dataset.live = "stopped";
      } else if (editing || aiming) {
        document.body.dataset.live = "held";
      } else {
        document.body.dataset.live = "reloading";
        location.reload();
      }
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
