"""IKEv2 (RFC 7296) for simpletun: a sans-IO codec, key schedule and state machines.

- :mod:`simpletun.ike.message`: payload/message codec, strict parsing
- :mod:`simpletun.ike.crypto`: transforms, Diffie-Hellman, prf+, SK payload, AUTH
- :mod:`simpletun.ike.ts`: traffic selectors and narrowing
- :mod:`simpletun.ike.machine`: :class:`Endpoint`, the initiator/responder state machines
"""

from simpletun.ike.machine import (
    ChildSaFailed,
    Endpoint,
    Identity,
    IkeSaDown,
    IkeSaRekeyed,
    IkeSaUp,
    InstallChildSa,
    PeerConfig,
    RemoveChildSa,
    Send,
)

__all__ = [
    "ChildSaFailed",
    "Endpoint",
    "Identity",
    "IkeSaDown",
    "IkeSaRekeyed",
    "IkeSaUp",
    "InstallChildSa",
    "PeerConfig",
    "RemoveChildSa",
    "Send",
]
