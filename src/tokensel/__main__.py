from tokensel.cli import main

main()
