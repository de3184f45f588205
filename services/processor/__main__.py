from services.processor.service import main

main()
