"""Process groups, launching ranks with torch's elastic launcher, network-average evaluation."""
