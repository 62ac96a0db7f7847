"""Edge layer for model-backed decisions at run time: HTTP, threads and clocks live here.

- `llm`: the shared LLM/VLM chat client (OpenAI-compatible and Ollama protocols), schema
  validation of JSON replies, and `AsyncChat`, the non-blocking wrapper loops use.
- `reference_llm_server`: a loopback server speaking both protocols, for tests and demos.
- `weighting`: `AsyncWeights`, LLM-proposed merge weights / skill scales that a loop reads
  every step without waiting (the pure prompt/parse/fallback parts are
  `mbjax.population.llm_weighting`).
- `menu_navigator`: `MenuNavigator`, VLM clicks on BonkArena's level-up menu (in process or as
  BonkLink clicks) with a deadline and a fallback, never blocking the game loop.
"""
