from quantune_edge.cli.app import main

main()
