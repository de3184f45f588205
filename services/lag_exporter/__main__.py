from services.lag_exporter.service import main

main()
