from quantune_edge.cli import main

main()
