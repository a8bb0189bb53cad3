"""One module per `mer` command: its options (`add_arguments`) beside the function that
runs it (`run`, typed keyword parameters). `mer.cli` imports only the chosen one."""
