from llava_cli.cli import program

program()
