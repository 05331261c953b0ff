"""A password field that unlocks a passphrase-protected key file for this notebook's process
(``%cronium_unlock PATH``): for frontends that cannot answer an input request while a cell runs.
The passphrase is cleared from the field at once and never stored; the decrypted key stays in
memory (see :mod:`cronium_nb.ssh.keys`)."""

from __future__ import annotations

import html
import os

import ipywidgets as widgets

from cronium_nb.errors import ConnectError
from cronium_nb.ssh import keys


def unlock_widget(path: str) -> widgets.VBox:
    path = os.path.expanduser(path)
    field = widgets.Password(description="Passphrase", placeholder=f"for {path}")
    button = widgets.Button(description="Unlock", button_style="primary")
    status = widgets.HTML(f"key <code>{html.escape(path)}</code>: enter its passphrase")

    def unlock(_button: widgets.Button) -> None:
        secret, field.value = field.value, ""
        try:
            keys.unlock(path, secret)
        except ConnectError as error:
            status.value = f"<span style='color:#b00'>{html.escape(str(error))}</span>"
        else:
            status.value = f"key <code>{html.escape(path)}</code> unlocked for this notebook"

    button.on_click(unlock)
    return widgets.VBox([widgets.HBox([field, button]), status])
