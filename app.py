"""The workbench dashboard: `streamlit run app.py` (or `make app`).

Opens on SmolLM2-135M (fetch it once with `workbench fetch smollm2-135m`); the sidebar switches to the
built-in models, which need nothing. Start on another model with `?model=NAME` in the URL or
`WORKBENCH_APP_MODEL=NAME`. The pages live in workbench/app/.
"""

from workbench.app.main import main

main()
