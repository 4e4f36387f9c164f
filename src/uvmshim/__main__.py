from uvmshim.cli.main import main

main()
