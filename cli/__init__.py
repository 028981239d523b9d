"""The `loopscope` command-line tool."""
