"""What the service stores: the tables and the queries that write and read them."""
