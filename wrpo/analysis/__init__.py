"""Reading finished runs: `wrpo report` (plots and summary) and `wrpo experiment margins`.
May import every layer below the CLI. See docs/architecture.md."""
