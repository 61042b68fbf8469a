"""Model I/O, shared by training and the lens: the typed config (:mod:`.config`), its validation as untrusted
data (:mod:`.safe_config`), preprocessing (:mod:`.preprocessing`) and saving / loading / Hub (:mod:`.hub`)."""
