from histoembed.cli import main

main()
