"""mkdocs hook: the home page is README.md, so the two cannot drift apart; its links into docs/ become relative."""
import pathlib
import re


def on_page_markdown(markdown, page, config, files):
  if page.file.src_uri != "index.md":
    return markdown
  readme = (pathlib.Path(config["config_file_path"]).parent / "README.md").read_text()
  return re.sub(r"\]\(docs/", "](", readme)
