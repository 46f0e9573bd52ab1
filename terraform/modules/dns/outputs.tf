output "fqdn" {
  description = "Name of the record that was created."
  value       = var.use_alias ? aws_route53_record.alias[0].fqdn : aws_route53_record.address[0].fqdn
}
