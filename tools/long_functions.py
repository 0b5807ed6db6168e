"""List C functions in csrc/ longer than a limit (default 120 lines), and files over a
limit (default 600 lines for *_body.h): the size rules of docs/architecture.md.

    python tools/long_functions.py [--function-limit 120] [--body-limit 600]
Exit status 1 when something is over a limit."""
import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def functions(path):
    """(name, first line, length) of each top-level function: a line "{" at column 0 after
    its signature, through the matching "}" at column 0."""
    lines = path.read_text().split("\n")
    out = []
    for i, line in enumerate(lines):
        if line != "{":
            continue
        j = i - 1
        while j > 0 and lines[j - 1].strip() and not lines[j - 1].rstrip().endswith((";", "}", "*/")) \
                and not lines[j - 1].startswith(("#", "/*", " *")):
            j -= 1
        end = next((k for k in range(i + 1, len(lines)) if lines[k] == "}"), len(lines) - 1)
        m = re.search(r"FN\((\w+)\)\s*\(", " ".join(lines[j:i])) or re.search(r"(\w+)\s*\(", " ".join(lines[j:i]))
        out.append((m.group(1) if m else lines[j].strip(), j + 1, end - j + 1))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--function-limit", type=int, default=120)
    ap.add_argument("--body-limit", type=int, default=600)
    args = ap.parse_args()
    over = 0
    for path in sorted((ROOT / "csrc").glob("*.[ch]")):
        n = len(path.read_text().split("\n"))
        if path.name.endswith("_body.h") and n > args.body_limit:
            print(f"{path.relative_to(ROOT)}: {n} lines (limit {args.body_limit})")
            over += 1
        for name, first, length in functions(path):
            if length > args.function_limit:
                print(f"{path.relative_to(ROOT)}:{first}: {name}: {length} lines "
                      f"(limit {args.function_limit})")
                over += 1
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
