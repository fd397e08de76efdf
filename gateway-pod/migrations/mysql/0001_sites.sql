-- Default site table. Egroups may point at another table or columns; these are the defaults.
CREATE TABLE IF NOT EXISTS sites (
    peer_id             VARCHAR(255) NOT NULL PRIMARY KEY,
    psk                 VARCHAR(255) NOT NULL,
    remote_subnet       VARCHAR(64)  NOT NULL,
    peer_address        VARCHAR(255) NULL,
    backup_peer_address VARCHAR(255) NULL,
    -- The initiator path looks sites up by subnet (destination & egroup mask).
    INDEX sites_remote_subnet (remote_subnet)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
