-- Default site table. Egroups may point at another table or columns; these are the defaults.
CREATE TABLE IF NOT EXISTS sites (
    peer_id             TEXT NOT NULL PRIMARY KEY,
    psk                 TEXT NOT NULL,
    remote_subnet       TEXT NOT NULL,
    peer_address        TEXT NULL,
    backup_peer_address TEXT NULL
);
-- The initiator path looks sites up by subnet (destination & egroup mask).
CREATE INDEX IF NOT EXISTS sites_remote_subnet ON sites (remote_subnet);
