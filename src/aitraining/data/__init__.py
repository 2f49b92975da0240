"""The data: rows on disk -> `Example`s (prompt, response or None), and how a model sees a prompt.

    files.py      rows of a .jsonl/.json/.csv/.parquet file, a folder of split files or a datasets folder
    examples.py   rows -> Examples in the three documented formats; the held-out rows
    templates.py  prompt templates and chat templates -> the token ids a model sees
"""
