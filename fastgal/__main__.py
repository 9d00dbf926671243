from fastgal.cli import main

main()
