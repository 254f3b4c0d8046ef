"""No plain-file call on a path a user can give: those go through storage.py.

Scans every module for calls that only understand local paths (`open`,
`os.path.*`, `os.replace`, `glob.glob`, `shutil.*`, ...). The few that touch
paths which are always local are listed here, each with its reason.
"""
import ast
import os

from tests.helpers import REPO

PACKAGE = os.path.join(REPO, "phenaki_jax")

LOCAL_ONLY_CALLS = {
    "open", "os.path", "os.replace", "os.rename", "os.remove", "os.unlink", "os.makedirs",
    "os.mkdir", "os.listdir", "os.scandir", "os.walk", "os.stat", "os.rmdir", "glob.glob",
    "glob.iglob", "shutil", "pathlib.Path", "Path", "np.load", "np.save", "np.savez",
    "np.savez_compressed", "Image.open", "av.open", "imageio.imwrite", "imageio.mimwrite",
    "imageio.get_writer", "imageio.imread", "imageio.v3.imread", "imageio.v3.imwrite",
    "iio.imwrite", "iio.imread",
}

# (module, call) -> why the path there is always local.
ALLOWED = {
    ("storage.py", "*"): "the path layer itself: its local branch",
    ("pretrained/perceptual.py", "os.path.join"): "I3D / LPIPS weights ship inside their pip packages",
    ("pretrained/perceptual.py", "os.path.dirname"): "I3D / LPIPS weights ship inside their pip packages",
    ("pretrained/perceptual.py", "os.path.exists"): "I3D / LPIPS weights ship inside their pip packages",
    ("pretrained/perceptual.py", "open"): "I3D / LPIPS weights ship inside their pip packages",
    ("pretrained/clip_tokenizer.py", "os.path.join"): "the merges file inside an installed open_clip package",
    ("pretrained/clip_tokenizer.py", "os.path.exists"): "the merges file inside an installed open_clip package",
    ("text/t5_weights.py", "np.load"): "reads an in-memory io.BytesIO of bytes storage.read_bytes fetched",
    ("data/video_io.py", "av.open"): "FFmpeg opens a local file: the media itself or its "
                                      "storage.local_copy, or a storage.staged_file it encodes into",
    ("data/video_io.py", "Image.open"): "decodes an in-memory io.BytesIO of storage.read_bytes",
    ("data/sources.py", "Image.open"): "decodes a frame's PNG/JPEG bytes from a record (io.BytesIO)",
    ("data/prepare.py", "open"): "the per-worker lock file, made only in a local output folder "
                                 "(object storage has no locks)",
}


def _dotted(node):
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name):
    parts.append(node.id)
    return ".".join(reversed(parts))
  return None


def _flagged(name):
  if name is None:
    return None
  for call in LOCAL_ONLY_CALLS:
    if name == call or name.startswith(call + "."):
      return call if call in ("os.path", "shutil") and name != call else name
  return None


def local_file_calls(package=PACKAGE):
  """[(module relative path, call name, line)] for every local-only call."""
  found = []
  for root, _, files in os.walk(package):
    for f in sorted(files):
      if not f.endswith(".py"):
        continue
      full = os.path.join(root, f)
      rel = os.path.relpath(full, package)
      tree = ast.parse(open(full).read(), full)
      for node in ast.walk(tree):
        if isinstance(node, ast.Call):
          name = _flagged(_dotted(node.func))
          if name:
            found.append((rel, _dotted(node.func), node.lineno))
  return found


def _allowed(rel, name):
  return (rel, "*") in ALLOWED or (rel, name) in ALLOWED


def test_user_paths_go_through_the_storage_layer():
  bad = [f"phenaki_jax/{rel}:{line}: {name}(...)" for rel, name, line in local_file_calls()
         if not _allowed(rel, name)]
  assert not bad, ("calls that only work on local paths; use phenaki_jax.storage, or add "
                   "the call to ALLOWED with the reason its path is always local:\n  "
                   + "\n  ".join(bad))


def test_every_allowance_is_used_and_has_a_reason():
  used = {(rel, name) for rel, name, _ in local_file_calls()}
  used |= {(rel, "*") for rel, _ in used}
  for key, reason in ALLOWED.items():
    assert reason.strip(), key
    assert key in used, f"{key} is allowed but no longer called: drop it from ALLOWED"


def test_the_scan_catches_each_kind_of_call(tmp_path):
  (tmp_path / "m.py").write_text(
      "import os, shutil, glob\n"
      "def f(p):\n"
      "  open(p)\n  os.path.exists(p)\n  os.replace(p, p)\n  glob.glob(p)\n"
      "  shutil.copy(p, p)\n  os.makedirs(p)\n")
  names = [name for _, name, _ in local_file_calls(str(tmp_path))]
  assert names == ["open", "os.path.exists", "os.replace", "glob.glob", "shutil.copy",
                   "os.makedirs"], names
