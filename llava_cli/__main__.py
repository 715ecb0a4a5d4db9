from llava_cli.cli import main

main()
