"""Runbook tests (`runbookctl test`): an incident, the outcome to assume for each step, and
the path the runbook must take, run through the bot's own engine with nothing executed.

  files    find test files beside the catalog (its ``tests/`` folder), read them with
           positions, check them against their JSON Schema (``schema.json``); imports
           only the catalog core, so `runbookctl lint` can check test files
  runner   run one test on ``bot.local.LocalRuntime`` with a scripted runner, and compare
           what happened with what the test expects (imports the engine)

The format is documented in docs/catalog.md ("Runbook tests").
"""
