"""`dbtrain ui`: the trainer in a browser (Gradio, the [ui] extra; docs/guide/ui.md).

Every run is a `dbtrain` child process with the command line the page shows (jobs), built from the page's
form and checked with the CLI's parser (forms), in a new folder under --runs_dir (runs); the Train page reads
its progress back from what the run writes. Only app.py and the *_page.py modules import Gradio.
May import every layer below it; nothing imports it but trainer.commands.ui.
"""
