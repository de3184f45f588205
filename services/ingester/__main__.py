from services.ingester.service import main

main()
