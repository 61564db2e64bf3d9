"""The bottom tier: command-line helpers, user errors, process groups, ZeRO-3 views, files, seeds."""
