from aipm.cli import main

main()
