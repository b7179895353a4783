from mpocompress.cli import main

main()
