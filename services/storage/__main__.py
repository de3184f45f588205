from services.storage.service import main

main()
