"""The event type, where it was first published: :mod:`alchemium.domain_event` holds it now.

``DomainEvent`` lives below the unit of work (which records events without knowing
how they are stored or delivered); this module keeps ``from alchemium.events.event
import DomainEvent`` working.
"""

from alchemium.domain_event import DomainEvent
from alchemium.encoding import json_safe

__all__ = ["DomainEvent", "json_safe"]
