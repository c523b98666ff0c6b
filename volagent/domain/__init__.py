"""The pure domain: names, rules and models that know no adapter, process or file."""
