#!/usr/bin/env python3
"""Prints the machine's own Debian package sources, so build scripts never name a mirror.

    apt-sources.py deb-src     # one-line "deb-src URI SUITE COMPONENTS" entries (for apt-get source)
    apt-sources.py mirror      # the first main archive URI (for debootstrap)

Reads deb822 files (/etc/apt/sources.list.d/*.sources) and one-line lists (*.list,
/etc/apt/sources.list); disabled files (other suffixes) are skipped like apt skips them.
"""

import glob
import sys


def entries() -> list[tuple[str, str, str]]:
    """(uri, suite, components) for every enabled binary source."""
    out: list[tuple[str, str, str]] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in open(path).read().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    out.append((uri, suite, fields.get("components", "main")))
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            lines = open(path).read().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                words = [w for w in words if not w.startswith("[")]
                out.append((words[1], words[2], " ".join(words[3:]) or "main"))
    return out


def main() -> int:
    found = entries()
    if not found:
        print("no enabled apt sources found", file=sys.stderr)
        return 1
    if sys.argv[1:] == ["deb-src"]:
        for uri, suite, components in found:
            print(f"deb-src {uri} {suite} {components}")
    elif sys.argv[1:] == ["mirror"]:
        main_archive = [u for u, s, _ in found if "-" not in s] or [found[0][0]]
        print(main_archive[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
