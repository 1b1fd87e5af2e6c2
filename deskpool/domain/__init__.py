"""Pure data: dataclasses, enums and value rules. No I/O, no imports from other layers."""
