"""`mixq`, the command line: main.py holds the group and registers every command; one module per command."""
