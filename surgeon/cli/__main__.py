from surgeon.cli.commands import main

main()
