# The token itself is no output: the hosts read it from the parameter.

output "endpoint_address" {
  description = "DNS name of the primary endpoint (it follows a failover to the promoted replica)."
  value       = aws_elasticache_replication_group.this.primary_endpoint_address
}

output "port" {
  description = "TCP port of the cache (TLS)."
  value       = aws_elasticache_replication_group.this.port
}

output "auth_token_parameter_name" {
  description = "Name of the SSM SecureString holding the AUTH token (the gateway role's gateway_redis_auth_ssm_parameter)."
  value       = aws_ssm_parameter.auth_token.name
}

output "auth_token_parameter_arn" {
  description = "ARN of that parameter, the only one the hosts' role may read."
  value       = aws_ssm_parameter.auth_token.arn
}

output "security_group_id" {
  description = "Security group of the cache nodes."
  value       = aws_security_group.this.id
}
