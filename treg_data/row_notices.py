"""Rows that treg-score keeps but that look like a mistake, said as warnings (the pairs are scored as given):

- an id seen before: the ids no longer name one pair each (`treg-inspect --id` shows one of them), and a
  pair given twice is trained on twice. Remembered as 8-byte digests, so a million rows cost about 70 MB;
- a role that no chat template of the common families knows: most templates write any role into the
  prompt as it is spelt, so a typo such as "usr" changes the text the model is scored on, silently.
"""

from __future__ import annotations

import hashlib

from treg_data.pairs import PreferencePair

KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer", "function", "ipython")
SHOWN = 5  # duplicate ids named one by one; the rest are counted


class RowNotices:
    def __init__(self):
        self.seen: set[int] = set()
        self.duplicate_ids = 0
        self.roles_warned: set[str] = set()

    def check(self, index: int, pair: PreferencePair) -> list[str]:
        """The warnings this pair (input row `index`) raises for the first time."""
        lines = []
        digest = int.from_bytes(hashlib.blake2b(pair.id.encode(), digest_size=8).digest(), "little")
        if digest in self.seen:
            self.duplicate_ids += 1
            if self.duplicate_ids <= SHOWN:
                lines.append(f"warning: input row {index} has the id {pair.id!r} of an earlier row; both pairs are "
                             "kept (give each row its own id, or remove the repeat)")
        self.seen.add(digest)
        for message in pair.prompt:
            role = message["role"]
            if role not in KNOWN_ROLES and role not in self.roles_warned:
                self.roles_warned.add(role)
                lines.append(f"warning: pair {pair.id} (input row {index}): the role {role!r} is none of "
                             f"{', '.join(KNOWN_ROLES)}; the chat template writes it as spelt: is it a typo?")
        return lines
