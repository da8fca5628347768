"""Plain full-parameter SFT with TRL's token-level NLL. With anchor.enabled=true it becomes RPSFT."""

from . import Method, register

register(Method("sft", "full-parameter SFT, TRL's NLL", anchor="optional"))
