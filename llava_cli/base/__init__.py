"""The leaves every layer may use, importing nothing else of llava_cli: the option table and the
frozen `Settings`, the families table, user-facing errors, the terminal choke point, the safe
file reader/writer and the network deadline.

May import: nothing of llava_cli.
"""
