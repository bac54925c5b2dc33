"""The Streamlit dashboard: the only package of the workbench that imports streamlit.

``main.py`` routes the pages with ``st.navigation``; ``sidebar.py`` draws the shared sidebar;
``cached.py`` holds every ``st.cache_*`` wrapper; each page module lays out widgets and calls the
library. ``choices.py``, ``compute.py`` and ``figures.py`` are pure (no streamlit).
"""
