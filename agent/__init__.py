"""meshagent: a peer-to-peer agent for fleets of Raspberry Pi-class devices."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
