"""What the tests share: stores, pictures, fault proxies, launch helpers and rank scripts."""
