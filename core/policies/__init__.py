"""Pure business rules: no I/O, no Prefect, tested on their own."""
