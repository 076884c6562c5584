from mctl.cli.main import main

main()
