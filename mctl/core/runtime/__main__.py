from mctl.core.runtime.worker import main

main()
