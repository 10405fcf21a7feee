"""Who runs the ``crops`` and ``embed`` stages' work: ``local`` (this machine) or ``ray`` (a Ray cluster).

Both write the same files through the same ``seams`` (the forward of a batch's views, the crops still to
embed, the store's parts). Neither engine imports the other; the stage picks one, and imports ``ray`` (the
optional extra ``histoembed[ray]``) only when it is picked.
"""
