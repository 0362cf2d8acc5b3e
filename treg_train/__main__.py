from treg_train.cli import main

main()
