"""Job functions behind the `litquant` CLI subcommands (jsonargparse builds each parser from the signature)."""
