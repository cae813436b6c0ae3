from aipm import main

main()
